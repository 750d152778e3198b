//! Backing files: fully-local regular files written out whole under `<root>/files/`, for FUSE
//! passthrough (the kernel then reads them directly, with no chunk check of its own).
//!
//! A backing file is named by the BLAKE3 of its chunk list ([`backing_name`]), so identical files
//! of any image share one. It is a cache of verified chunks: written to a temporary name, fsynced
//! and renamed, so a crash never leaves a partial file under a final name; and an existing one is
//! trusted only after its content was checked against its chunk list ([`Store::backing_file`]):
//! anything may have written to it since. `fsck` checks every backing file a stored layer names,
//! `gc` removes those no stored layer names, `usage` counts them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hb_core::{ChunkRef, Kind, LayerIndex};

use crate::error::{Result, StoreError};
use crate::Store;

/// The folder of backing files under a store's root.
pub const BACKING_DIR: &str = "files";

/// A temporary file older than this is a dead writer's (a live one renames within seconds).
const STALE_TEMP: Duration = Duration::from_secs(600);

/// The name of the backing file of a file made of `chunks`: the hex BLAKE3 of their ids in order.
pub fn backing_name<'a>(chunks: impl IntoIterator<Item = &'a ChunkRef>) -> String {
    let mut h = blake3::Hasher::new();
    for c in chunks {
        h.update(c.id.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// What is wrong with a backing file's content, if anything.
#[derive(Debug, PartialEq, Eq)]
pub enum BackingFault {
    /// Its length is not the sum of its chunks' lengths.
    Length { on_disk: u64, want: u64 },
    /// The bytes at `offset` do not hash to the chunk id the chunk list names there.
    Chunk { offset: u64, index: usize },
}

impl std::fmt::Display for BackingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackingFault::Length { on_disk, want } => write!(f, "{on_disk} bytes on disk, its chunks make {want}"),
            BackingFault::Chunk { offset, index } => {
                write!(f, "chunk {index} (at byte {offset}) does not match its id")
            }
        }
    }
}

/// Checks the file at `path` against `chunks`: its length, then the BLAKE3 of each stretch.
/// `Ok(None)`: it is exactly those chunks.
pub fn check_backing(path: &Path, chunks: &[ChunkRef]) -> std::io::Result<Option<BackingFault>> {
    let mut f = std::fs::File::open(path)?;
    let want: u64 = chunks.iter().map(|c| c.len as u64).sum();
    let on_disk = f.metadata()?.len();
    if on_disk != want {
        return Ok(Some(BackingFault::Length { on_disk, want }));
    }
    let mut buf = Vec::new();
    let mut offset = 0u64;
    for (index, c) in chunks.iter().enumerate() {
        buf.resize(c.len as usize, 0);
        f.read_exact(&mut buf)?;
        if *blake3::hash(&buf).as_bytes() != *c.id.as_bytes() {
            return Ok(Some(BackingFault::Chunk { offset, index }));
        }
        offset += c.len as u64;
    }
    Ok(None)
}

/// Adds the backing file every regular file of `idx` would have: its name and chunk list.
pub(crate) fn add_backing_lists(idx: &LayerIndex, into: &mut HashMap<String, Vec<ChunkRef>>) {
    for (i, e) in idx.entries.iter().enumerate() {
        if matches!(e.kind, Kind::File { .. }) && idx.file_chunks(i as u32).next().is_some() {
            let list: Vec<ChunkRef> = idx.file_chunks(i as u32).copied().collect();
            into.entry(backing_name(&list)).or_insert(list);
        }
    }
}

/// One entry of the backing folder.
pub(crate) enum BackingEntry {
    /// A file under a final name, with its length.
    File { name: String, path: PathBuf, len: u64 },
    /// A writer's temporary file, and whether it is old enough to be a dead writer's.
    Temp { path: PathBuf, len: u64, stale: bool },
}

impl Store {
    /// The folder of this store's backing files.
    pub fn backing_dir(&self) -> PathBuf {
        self.root.join(BACKING_DIR)
    }

    /// The backing file of a file made of `chunks`, checked or written now; `Ok(None)` when
    /// some chunk is not local. An existing file is used only if its content matches `chunks`
    /// (a damaged one is logged and written again), so a mount never hands the kernel bytes
    /// that were not verified. Writes go to a temporary name, fsynced, then renamed.
    pub fn backing_file(&self, chunks: &[ChunkRef]) -> Result<Option<PathBuf>> {
        let dir = self.backing_dir();
        let path = dir.join(backing_name(chunks));
        match check_backing(&path, chunks) {
            Ok(None) => return Ok(Some(path)),
            Ok(Some(fault)) => {
                tracing::warn!(file = %path.display(), %fault, "a backing file does not match its chunks; writing it again")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot check a backing file; writing it again")
            }
        }
        for c in chunks {
            if !self.has_chunk(&c.id)? {
                return Ok(None);
            }
        }
        std::fs::create_dir_all(&dir).map_err(StoreError::io(format!("creating {}", dir.display())))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)
            .map_err(StoreError::io(format!("creating a file in {}", dir.display())))?;
        for c in chunks {
            // read_chunk verifies each chunk against its id.
            tmp.write_all(&self.read_chunk(&c.id)?)
                .map_err(StoreError::io(format!("writing a file in {}", dir.display())))?;
        }
        tmp.as_file().sync_all().map_err(StoreError::io(format!("syncing a file in {}", dir.display())))?;
        tmp.persist(&path)
            .map_err(|e| StoreError::Io { context: format!("renaming into {}", dir.display()), source: e.error })?;
        Ok(Some(path))
    }

    /// Everything in the backing folder (nothing when it does not exist).
    pub(crate) fn backing_entries(&self) -> Result<Vec<BackingEntry>> {
        let dir = self.backing_dir();
        let rd = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            r => r.map_err(StoreError::io(format!("listing {}", dir.display())))?,
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(StoreError::io(format!("listing {}", dir.display())))?;
            let Ok(m) = e.metadata() else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                let stale = m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > STALE_TEMP);
                out.push(BackingEntry::Temp { path: e.path(), len: m.len(), stale });
            } else {
                out.push(BackingEntry::File { name, path: e.path(), len: m.len() });
            }
        }
        Ok(out)
    }
}
