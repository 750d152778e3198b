//! Raw objects: blobs kept byte for byte (a registry's compressed layers, manifests, configs),
//! cut with the store's chunker so identical stretches are stored once. A raw object is named by
//! the SHA-256 of its bytes; its record lists its chunks, each of which it references once
//! (refcount), exactly like a layer index. The pull-through mirror keeps what it serves here.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::rc::Rc;

use hb_core::{ChunkId, ChunkRef, Digest, DigestHasher};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::error::{Result, StoreError};
use crate::ingest::{ChunkTally, Hashing, Seen};
use crate::meta::*;
use crate::pack::Location;
use crate::{Progress, Store};

const RAW_PREFIX: &[u8] = b"raw/";

/// A stored raw object: its size and its chunks in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

impl RawRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + self.chunks.len() * 36);
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            b.extend_from_slice(c.id.as_bytes());
            b.extend_from_slice(&c.len.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = || StoreError::CorruptMeta("raw object record is malformed".into());
        if b.len() < 12 {
            return Err(bad());
        }
        let size = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        if b.len() != 12 + n * 36 {
            return Err(bad());
        }
        let chunks: Vec<ChunkRef> = b[12..]
            .chunks_exact(36)
            .map(|c| ChunkRef {
                id: ChunkId(c[..32].try_into().expect("32 bytes")),
                len: u32::from_le_bytes(c[32..].try_into().expect("4 bytes")),
            })
            .collect();
        if chunks.iter().map(|c| c.len as u64).sum::<u64>() != size {
            return Err(bad());
        }
        Ok(RawRecord { size, chunks })
    }
}

/// What [`Store::put_raw`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RawReport {
    pub digest: Digest,
    pub size: u64,
    pub chunks: usize,
    /// Chunks (and their bytes) the store did not have.
    pub new_chunks: usize,
    pub new_bytes: u64,
    /// Bytes appended to pack files.
    pub stored_bytes: u64,
    pub already_present: bool,
}

fn raw_key(digest: &Digest) -> Vec<u8> {
    let mut k = RAW_PREFIX.to_vec();
    k.extend_from_slice(digest.as_bytes());
    k
}

impl Store {
    /// Stores `input` byte for byte as the raw object `expect`. The SHA-256 of what was read is
    /// checked before anything becomes visible: a mismatch (or a read error) stores nothing.
    pub fn put_raw(&self, input: impl Read, expect: &Digest, progress: &dyn Progress) -> Result<RawReport> {
        let _gate = self.gate.read().expect("gate lock");
        let (mut pack, committed) = self.take_pack()?;
        let out = self
            .write_chunks(&mut pack, |tx| {
                let count = Rc::new(Cell::new(0u64));
                let mut hashing = Hashing { inner: input, hasher: DigestHasher::new(), count: count.clone() };
                let mut seen = HashMap::new();
                let mut tally = ChunkTally::default();
                let mut chunks = Vec::new();
                let cdc = self.cut(&mut hashing);
                for c in cdc {
                    let c = c.map_err(|e| match e {
                        fastcdc::v2020::Error::IoError(e) => {
                            StoreError::BadStream(format!("reading the blob failed: {e}"))
                        }
                        other => StoreError::BadStream(format!("chunking failed: {other:?}")),
                    })?;
                    progress.advance(c.length as u64);
                    chunks.push(self.add_chunk(c.data, &mut seen, &mut tally, tx)?);
                }
                let digest = hashing.hasher.finish();
                if digest != *expect {
                    return Err(StoreError::DigestMismatch { expected: *expect, actual: digest });
                }
                Ok((RawRecord { size: count.get(), chunks }, seen, tally))
            })
            .and_then(|((record, seen, tally), locations, stored)| {
                self.commit_raw(expect, record, seen, tally, locations, stored, &mut pack, committed)
            });
        if out.is_err() {
            pack.rollback(committed)?;
        }
        self.return_pack(pack);
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_raw(
        &self,
        digest: &Digest,
        record: RawRecord,
        seen: HashMap<ChunkId, Seen>,
        tally: ChunkTally,
        locations: HashMap<ChunkId, Location>,
        stored: u64,
        pack: &mut crate::pack::PackWriter,
        committed: u64,
    ) -> Result<RawReport> {
        let _w = self.writer.lock().expect("writer lock");
        let mut report = RawReport {
            digest: *digest,
            size: record.size,
            chunks: record.chunks.len(),
            new_chunks: tally.new_chunks,
            new_bytes: tally.new_bytes,
            stored_bytes: stored,
            already_present: false,
        };
        if self.db.get_pinned(raw_key(digest))?.is_some() {
            pack.rollback(committed)?;
            report.already_present = true;
            (report.new_chunks, report.new_bytes, report.stored_bytes) = (0, 0, 0);
            return Ok(report);
        }
        let mut pack_rec = self.pack_records()?.remove(&pack.id).unwrap_or_default();
        let mut place = |id: &ChunkId| crate::ingest::placed(&locations, &mut pack_rec, id);
        let mut batch = WriteBatch::default();
        let mut new_ids = Vec::new();
        self.reference_chunks(&seen, &mut place, &mut batch, &mut new_ids)?;
        batch.put(raw_key(digest), record.encode());
        self.write_commit(batch, pack, committed, pack_rec, &new_ids)?;
        tracing::debug!(%digest, size = record.size, new_chunks = report.new_chunks, "raw object committed");
        Ok(report)
    }

    /// The record of raw object `digest`, if stored.
    pub fn raw(&self, digest: &Digest) -> Result<Option<RawRecord>> {
        self.db.get_pinned(raw_key(digest))?.map(|v| RawRecord::decode(&v)).transpose()
    }

    /// Every raw object with its record.
    pub fn raw_objects(&self) -> Result<Vec<(Digest, RawRecord)>> {
        let mut out = Vec::new();
        for item in self.db.iterator(IteratorMode::From(RAW_PREFIX, Direction::Forward)) {
            let (k, v) = item?;
            let Some(d) = k.strip_prefix(RAW_PREFIX) else { break };
            out.push((digest_from_key(d)?, RawRecord::decode(&v)?));
        }
        Ok(out)
    }

    /// Forgets raw object `digest`: its record goes and its chunks lose a reference, in one synced
    /// batch. Chunks nothing references any more are freed by the next `gc`.
    pub fn remove_raw(&self, digest: &Digest) -> Result<bool> {
        self.writable()?;
        let _gate = self.gate.read().expect("gate lock");
        let _w = self.writer.lock().expect("writer lock");
        let Some(record) = self.raw(digest)? else { return Ok(false) };
        let mut batch = WriteBatch::default();
        let distinct: HashSet<ChunkId> = record.chunks.iter().map(|c| c.id).collect();
        for id in distinct {
            let rec = self.chunk_record(&id)?.ok_or(StoreError::MissingChunk(id))?;
            let rec = ChunkRecord { refcount: rec.refcount.saturating_sub(1), ..rec };
            batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), rec.encode());
        }
        batch.delete(raw_key(digest));
        self.sync_write(batch)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_bad_bytes() {
        let r = RawRecord {
            size: 70,
            chunks: vec![ChunkRef { id: ChunkId::of(b"a"), len: 30 }, ChunkRef { id: ChunkId::of(b"b"), len: 40 }],
        };
        assert_eq!(RawRecord::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] = 71;
        assert!(RawRecord::decode(&bad).is_err(), "sizes must add up");
        assert!(RawRecord::decode(&r.encode()[..20]).is_err());
    }
}
