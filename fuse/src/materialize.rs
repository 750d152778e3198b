//! Fully-local files written out whole, as backing files for FUSE passthrough. Named by the
//! BLAKE3 of their chunk list, so identical files of any image share one; written to a temporary
//! name, fsynced and renamed, so a crash never leaves a wrong file under a final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use hb_core::ChunkRef;
use hb_store::{Store, StoreError};

/// The backing file of `chunks`, writing it if needed; None if some chunk is not local.
pub fn materialize(store: &Store, dir: &Path, chunks: &[ChunkRef]) -> Result<Option<PathBuf>, StoreError> {
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    for c in chunks {
        h.update(c.id.as_bytes());
        size += c.len as u64;
    }
    let path = dir.join(h.finalize().to_hex().as_str());
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(Some(path));
    }
    for c in chunks {
        if !store.has_chunk(&c.id)? {
            return Ok(None);
        }
    }
    let io = |what: &str| {
        let what = format!("{what} {}", dir.display());
        move |e| StoreError::Io { context: what, source: e }
    };
    std::fs::create_dir_all(dir).map_err(io("creating"))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("creating a file in"))?;
    for c in chunks {
        tmp.write_all(&store.read_chunk(&c.id)?).map_err(io("writing a file in"))?;
    }
    tmp.as_file().sync_all().map_err(io("syncing a file in"))?;
    tmp.persist(&path)
        .map_err(|e| StoreError::Io { context: format!("renaming into {}", dir.display()), source: e.error })?;
    Ok(Some(path))
}
