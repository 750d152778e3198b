//! Pack files: chunks appended one after another, each behind a small header.
//!
//! Layout (documented in docs/formats/pack.md): an 8-byte file header `HBPK` + u32 LE version, then
//! records `id[32] | compression u8 | raw_len u32 LE | stored_len u32 LE | data[stored_len]`.
//! Packs are append-only; the metadata database records how many bytes of each are committed, and
//! bytes past that (an ingest that died) are cut off when the store is opened.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hb_core::ChunkId;

use crate::error::{Result, StoreError};

pub const PACK_MAGIC: &[u8; 4] = b"HBPK";
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_LEN: u64 = 8;
pub const RECORD_HEADER_LEN: usize = 32 + 1 + 4 + 4;

/// How a chunk's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Raw = 0,
    Zstd = 1,
}

impl Compression {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Compression::Raw),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

pub fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("pack-{id:08}.hbp"))
}

/// Parses `pack-00000012.hbp` into 12.
pub fn parse_pack_name(name: &str) -> Option<u32> {
    name.strip_prefix("pack-")?.strip_suffix(".hbp")?.parse().ok()
}

/// Where a chunk lives and how it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    /// Offset of the record header in the pack.
    pub offset: u64,
    pub raw_len: u32,
    pub stored_len: u32,
    pub compression: Compression,
}

impl Location {
    /// Pack id of chunks a lazy layer uses that are not fetched yet (real packs start at 1).
    pub const ABSENT_PACK: u32 = 0;

    /// The location of a chunk known by id and length only (see [`Location::ABSENT_PACK`]).
    pub fn absent(raw_len: u32) -> Location {
        Location { pack: Self::ABSENT_PACK, offset: 0, raw_len, stored_len: 0, compression: Compression::Raw }
    }

    pub fn is_absent(&self) -> bool {
        self.pack == Self::ABSENT_PACK
    }

    /// Bytes the record takes in its pack.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + self.stored_len as u64
    }
}

/// Encodes a chunk for a pack: zstd when it saves at least 1/32 of the bytes, raw otherwise.
pub fn encode_chunk(data: &[u8], level: i32) -> (Compression, Vec<u8>) {
    match zstd::bulk::compress(data, level) {
        Ok(c) if c.len() + data.len() / 32 < data.len() => (Compression::Zstd, c),
        _ => (Compression::Raw, data.to_vec()),
    }
}

/// Reads and verifies one chunk record: the header must name `id` with the recorded lengths and
/// the decoded bytes must hash to `id`.
pub fn read_chunk(file: &File, id: &ChunkId, loc: &Location) -> Result<Vec<u8>> {
    read_verified(file, id, loc).map(|(_, raw)| raw)
}

/// Like [`read_chunk`], also returning the record's stored (possibly compressed) bytes, verified
/// through the decoded ones, so they can be copied verbatim.
pub fn read_record(file: &File, id: &ChunkId, loc: &Location) -> Result<(Vec<u8>, Vec<u8>)> {
    let (mut record, raw) = read_verified(file, id, loc)?;
    record.drain(..RECORD_HEADER_LEN);
    Ok((raw, record))
}

/// The whole record as read, and its verified uncompressed content.
fn read_verified(file: &File, id: &ChunkId, loc: &Location) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = vec![0u8; loc.record_len() as usize];
    file.read_exact_at(&mut buf, loc.offset).map_err(|e| StoreError::CorruptChunk {
        id: *id,
        reason: format!("cannot read {} bytes at offset {} of pack {}: {e}", buf.len(), loc.offset, loc.pack),
    })?;
    let (hdr, data) = buf.split_at(RECORD_HEADER_LEN);
    let corrupt = |reason: String| StoreError::CorruptChunk { id: *id, reason };
    if &hdr[..32] != id.as_bytes() {
        return Err(corrupt(format!("pack {} offset {} holds another chunk", loc.pack, loc.offset)));
    }
    let raw_len = u32::from_le_bytes(hdr[33..37].try_into().expect("4 bytes"));
    let stored_len = u32::from_le_bytes(hdr[37..41].try_into().expect("4 bytes"));
    if hdr[32] != loc.compression as u8 || raw_len != loc.raw_len || stored_len != loc.stored_len {
        return Err(corrupt("record header disagrees with the metadata".into()));
    }
    let bytes = match loc.compression {
        Compression::Raw => data.to_vec(),
        Compression::Zstd => decompress(data, raw_len as usize).map_err(|e| corrupt(format!("zstd: {e}")))?,
    };
    if bytes.len() != raw_len as usize || ChunkId::of(&bytes) != *id {
        return Err(corrupt("content does not hash to its id".into()));
    }
    Ok((buf, bytes))
}

thread_local! {
    /// One zstd decompression context per thread: creating one per chunk costs more than
    /// decoding a 64 KiB chunk.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Decodes one zstd frame of at most `capacity` bytes with this thread's context.
pub(crate) fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("just set").decompress(data, capacity)
    })
}

/// Appends records to one pack file. Nothing is durable until [`PackWriter::sync`].
pub struct PackWriter {
    pub id: u32,
    path: PathBuf,
    out: BufWriter<File>,
    /// Length of the file including buffered bytes.
    len: u64,
    /// Bytes appended since the free space was last checked.
    unchecked: u64,
}

/// Free space a pack append leaves on the store's filesystem for the metadata database: RocksDB
/// must never meet a full disk (its commit could fail half-way; Debian's build even aborts).
const WRITE_RESERVE: u64 = 8 << 20;
/// How often (in appended bytes) an append checks the free space.
const CHECK_EVERY: u64 = 1 << 20;

/// Bytes available to hb on the filesystem of `fd`, if it says.
pub(crate) fn free_bytes(fd: impl std::os::fd::AsFd) -> Option<u64> {
    rustix::fs::fstatvfs(fd).ok().map(|v| v.f_bavail.saturating_mul(v.f_frsize))
}

impl PackWriter {
    /// Opens pack `id` for appending at `committed` (creating it with a header when new).
    pub fn open(dir: &Path, id: u32, committed: Option<u64>) -> Result<Self> {
        let path = pack_path(dir, id);
        let file = OpenOptions::new()
            .create(committed.is_none())
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(StoreError::io(format!("opening pack {}", path.display())))?;
        let len = match committed {
            Some(len) => {
                file.set_len(len).map_err(StoreError::io(format!("truncating {}", path.display())))?;
                len
            }
            None => {
                file.set_len(0).map_err(StoreError::io(format!("creating {}", path.display())))?;
                let mut hdr = PACK_MAGIC.to_vec();
                hdr.extend_from_slice(&PACK_VERSION.to_le_bytes());
                file.write_all_at(&hdr, 0).map_err(StoreError::io(format!("writing {}", path.display())))?;
                PACK_HEADER_LEN
            }
        };
        let mut out = BufWriter::with_capacity(1 << 20, file);
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(len))
            .map_err(StoreError::io(format!("seeking {}", path.display())))?;
        Ok(PackWriter { id, path, out, len, unchecked: CHECK_EVERY })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len <= PACK_HEADER_LEN
    }

    /// Appends a record and returns where it went.
    pub fn append(&mut self, id: &ChunkId, raw_len: u32, compression: Compression, stored: &[u8]) -> Result<Location> {
        let offset = self.len;
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        hdr[..32].copy_from_slice(id.as_bytes());
        hdr[32] = compression as u8;
        hdr[33..37].copy_from_slice(&raw_len.to_le_bytes());
        hdr[37..41].copy_from_slice(&(stored.len() as u32).to_le_bytes());
        let ctx = || format!("appending to {}", self.path.display());
        self.unchecked += (RECORD_HEADER_LEN + stored.len()) as u64;
        if self.unchecked >= CHECK_EVERY {
            self.unchecked = 0;
            if free_bytes(self.out.get_ref()).is_some_and(|free| free < WRITE_RESERVE) {
                return Err(StoreError::Io {
                    context: format!(
                        "appending to {}: fewer than {} MiB free (kept for the store's metadata)",
                        self.path.display(),
                        WRITE_RESERVE >> 20
                    ),
                    source: std::io::Error::from_raw_os_error(28),
                });
            }
        }
        self.out.write_all(&hdr).map_err(StoreError::io(ctx()))?;
        self.out.write_all(stored).map_err(StoreError::io(ctx()))?;
        self.len += (RECORD_HEADER_LEN + stored.len()) as u64;
        Ok(Location { pack: self.id, offset, raw_len, stored_len: stored.len() as u32, compression })
    }

    /// Flushes and fsyncs everything appended so far.
    pub fn sync(&mut self) -> Result<()> {
        let ctx = format!("syncing {}", self.path.display());
        self.out.flush().map_err(StoreError::io(ctx.clone()))?;
        self.out.get_ref().sync_data().map_err(StoreError::io(ctx))
    }

    /// Drops everything appended after `committed` (an aborted ingest).
    pub fn rollback(&mut self, committed: u64) -> Result<()> {
        let ctx = format!("rolling back {}", self.path.display());
        // Buffered bytes are discarded by truncating after the flush.
        let _ = self.out.flush();
        self.out.get_ref().set_len(committed).map_err(StoreError::io(ctx.clone()))?;
        std::io::Seek::seek(&mut self.out, std::io::SeekFrom::Start(committed)).map_err(StoreError::io(ctx))?;
        self.len = committed;
        Ok(())
    }
}
