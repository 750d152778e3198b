//! Export: a layer back to a tar stream, or layers merged into a rootfs directory.
//!
//! A rootfs export only ever creates entries inside directories it created itself, in a target
//! that was empty, and never follows a symlink it wrote: a layer's symlinks (absolute or not) are
//! recreated as links, never resolved.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hb_core::{merge_layers, ChunkRef, Digest, Kind, LayerIndex, Meta};
use rustix::fs::{AtFlags, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags, CWD};

use crate::error::{Result, StoreError};
use crate::{Progress, Store};

/// What a rootfs export wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExportReport {
    pub entries: usize,
    pub bytes: u64,
}

/// Streams a file's content chunk by chunk from the store.
struct ChunkReader<'a> {
    store: &'a Store,
    chunks: Vec<ChunkRef>,
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    progress: &'a dyn Progress,
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            let Some(c) = self.chunks.get(self.next) else { return Ok(0) };
            self.buf = self.store.read_chunk(&c.id).map_err(io::Error::other)?;
            self.pos = 0;
            self.next += 1;
            self.progress.advance(self.buf.len() as u64);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Recovers a store error carried through an `io::Error`, or wraps the I/O error with context.
fn unwrap_io(e: io::Error, context: impl FnOnce() -> String) -> StoreError {
    if e.get_ref().is_some_and(|i| i.is::<StoreError>()) {
        return *e.into_inner().expect("checked").downcast::<StoreError>().expect("checked");
    }
    StoreError::Io { context: context(), source: e }
}

fn os(p: &[u8]) -> &OsStr {
    OsStr::from_bytes(p)
}

impl Store {
    fn require_layer(&self, diff_id: &Digest) -> Result<LayerIndex> {
        self.layer(diff_id)?.ok_or_else(|| StoreError::UnknownLayer(diff_id.to_string()))
    }

    fn reader<'a>(&'a self, idx: &LayerIndex, i: u32, progress: &'a dyn Progress) -> ChunkReader<'a> {
        ChunkReader {
            store: self,
            chunks: idx.file_chunks(i).copied().collect(),
            next: 0,
            buf: Vec::new(),
            pos: 0,
            progress,
        }
    }

    /// Writes the layer as an uncompressed tar: every entry the layer listed, whiteouts and
    /// opaque markers included, with mode, owner, mtime (sub-second as PAX), xattrs (as PAX
    /// `SCHILY.xattr.*`), long names, links and device numbers. Entries come in sorted tree order.
    pub fn export_layer_tar(&self, diff_id: &Digest, out: impl Write, progress: &dyn Progress) -> Result<()> {
        let idx = self.require_layer(diff_id)?;
        progress.set_total(idx.content_bytes());
        let mut tar = tar::Builder::new(out);
        let ctx = || format!("writing the tar of layer {diff_id}");
        for (i, e) in idx.entries.iter().enumerate() {
            let i = i as u32;
            if !e.explicit {
                continue;
            }
            let mut path = if i == 0 { b".".to_vec() } else { idx.path(i) };
            if matches!(e.kind, Kind::Dir { .. }) {
                path.push(b'/');
            }
            let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
            for (k, v) in &e.meta.xattrs {
                let k = std::str::from_utf8(k).map_err(|_| StoreError::BadEntry {
                    path: String::from_utf8_lossy(&path).into_owned(),
                    reason: "xattr name is not UTF-8 and cannot be written as PAX".into(),
                })?;
                pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
            }
            if e.meta.mtime_nsec != 0 || e.meta.mtime < 0 {
                pax.push(("mtime".into(), pax_time(e.meta.mtime, e.meta.mtime_nsec).into_bytes()));
            }
            if !pax.is_empty() {
                tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(|e| unwrap_io(e, ctx))?;
            }
            let mut h = tar::Header::new_gnu();
            h.set_mode(e.meta.mode);
            h.set_uid(e.meta.uid as u64);
            h.set_gid(e.meta.gid as u64);
            h.set_mtime(e.meta.mtime.max(0) as u64);
            h.set_size(0);
            let r = match &e.kind {
                Kind::Dir { .. } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    tar.append_data(&mut h, os(&path), io::empty())
                }
                Kind::File { size, .. } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(*size);
                    tar.append_data(&mut h, os(&path), self.reader(&idx, i, progress))
                }
                Kind::Whiteout | Kind::Opaque => {
                    h.set_entry_type(tar::EntryType::Regular);
                    tar.append_data(&mut h, os(&path), io::empty())
                }
                Kind::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    tar.append_link(&mut h, os(&path), os(target))
                }
                Kind::Hardlink { target } => {
                    h.set_entry_type(tar::EntryType::Link);
                    tar.append_link(&mut h, os(&path), os(&idx.path(*target)))
                }
                Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                    let t = if matches!(e.kind, Kind::CharDev { .. }) {
                        tar::EntryType::Char
                    } else {
                        tar::EntryType::Block
                    };
                    h.set_entry_type(t);
                    h.set_device_major(*major)
                        .and_then(|_| h.set_device_minor(*minor))
                        .map_err(|e| unwrap_io(e, ctx))?;
                    tar.append_data(&mut h, os(&path), io::empty())
                }
                Kind::Fifo => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    tar.append_data(&mut h, os(&path), io::empty())
                }
            };
            r.map_err(|e| unwrap_io(e, ctx))?;
        }
        tar.into_inner().and_then(|mut w| w.flush()).map_err(|e| unwrap_io(e, ctx))?;
        Ok(())
    }

    /// Materialises `layers` (bottom first), merged as overlayfs would show them, into `dir`,
    /// which must be missing or empty. Owners are set when running as root.
    pub fn export_rootfs(&self, layers: &[Digest], dir: &Path, progress: &dyn Progress) -> Result<ExportReport> {
        let indexes = layers.iter().map(|d| self.require_layer(d)).collect::<Result<Vec<_>>>()?;
        let merged = merge_layers(self.chunker(), indexes.iter());
        prepare_target(dir)?;
        progress.set_total(merged.content_bytes());
        let as_root = rustix::process::geteuid().is_root();
        let mut report = ExportReport::default();
        let path_of = |i: u32| -> PathBuf { dir.join(os(&merged.path(i))) };
        let io_err = |p: &Path, what: &str| {
            let ctx = format!("{what} {}", p.display());
            move |e: io::Error| unwrap_io(e, || ctx)
        };
        let errno = |p: &Path, what: &str| {
            let ctx = format!("{what} {}", p.display());
            move |e: rustix::io::Errno| StoreError::Io { context: ctx, source: e.into() }
        };
        for (i, e) in merged.entries.iter().enumerate().skip(1) {
            let i = i as u32;
            let p = path_of(i);
            report.entries += 1;
            match &e.kind {
                Kind::Dir { .. } => std::fs::create_dir(&p).map_err(io_err(&p, "creating directory"))?,
                Kind::File { size, .. } => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                        .open(&p)
                        .map_err(io_err(&p, "creating"))?;
                    io::copy(&mut self.reader(&merged, i, progress), &mut f).map_err(io_err(&p, "writing"))?;
                    report.bytes += size;
                    if as_root {
                        rustix::fs::fchown(&f, Some(Uid::from_raw(e.meta.uid)), Some(Gid::from_raw(e.meta.gid)))
                            .map_err(errno(&p, "chown"))?;
                    }
                    rustix::fs::fchmod(&f, Mode::from_raw_mode(e.meta.mode)).map_err(errno(&p, "chmod"))?;
                    for (k, v) in &e.meta.xattrs {
                        rustix::fs::fsetxattr(&f, os(k), v, XattrFlags::empty())
                            .map_err(errno(&p, "setting xattrs on"))?;
                    }
                    rustix::fs::futimens(&f, &times(&e.meta)).map_err(errno(&p, "setting times on"))?;
                    continue;
                }
                Kind::Hardlink { target } => {
                    std::fs::hard_link(path_of(*target), &p).map_err(io_err(&p, "linking"))?;
                    continue; // shares the target's inode and metadata
                }
                Kind::Symlink { target } => {
                    std::os::unix::fs::symlink(os(target), &p).map_err(io_err(&p, "creating symlink"))?;
                }
                Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                    let t = if matches!(e.kind, Kind::CharDev { .. }) {
                        FileType::CharacterDevice
                    } else {
                        FileType::BlockDevice
                    };
                    rustix::fs::mknodat(CWD, &p, t, Mode::from_raw_mode(0o600), rustix::fs::makedev(*major, *minor))
                        .map_err(errno(&p, "creating device"))?;
                }
                Kind::Fifo => {
                    rustix::fs::mknodat(CWD, &p, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                        .map_err(errno(&p, "creating fifo"))?;
                }
                Kind::Whiteout | Kind::Opaque => unreachable!("merged views hold no whiteouts"),
            }
            if !matches!(e.kind, Kind::Dir { .. }) {
                set_meta_by_path(&p, &e.meta, matches!(e.kind, Kind::Symlink { .. }), as_root)?;
            }
        }
        // Directories last, deepest first, so creating their children does not change their times.
        for (i, e) in merged.entries.iter().enumerate().rev() {
            if matches!(e.kind, Kind::Dir { .. }) && (i != 0 || e.explicit) {
                let p = if i == 0 { dir.to_path_buf() } else { path_of(i as u32) };
                set_meta_by_path(&p, &e.meta, false, as_root)?;
            }
        }
        Ok(report)
    }
}

fn prepare_target(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(StoreError::TargetNotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(StoreError::io(format!("creating {}", dir.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(StoreError::TargetNotEmpty(dir.to_path_buf())),
        Err(e) => Err(StoreError::Io { context: format!("reading {}", dir.display()), source: e }),
    }
}

fn times(m: &Meta) -> Timestamps {
    let t = Timespec { tv_sec: m.mtime, tv_nsec: m.mtime_nsec as _ };
    Timestamps { last_access: t, last_modification: t }
}

/// Owner, mode, xattrs, times, in that order (chown clears setuid bits and capabilities).
fn set_meta_by_path(p: &Path, m: &Meta, symlink: bool, as_root: bool) -> Result<()> {
    let errno = |what: &str| {
        let ctx = format!("{what} {}", p.display());
        move |e: rustix::io::Errno| StoreError::Io { context: ctx, source: e.into() }
    };
    if as_root {
        rustix::fs::chownat(CWD, p, Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid)), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(errno("chown"))?;
    }
    if !symlink {
        rustix::fs::chmodat(CWD, p, Mode::from_raw_mode(m.mode), AtFlags::empty()).map_err(errno("chmod"))?;
    }
    for (k, v) in &m.xattrs {
        if let Err(e) = rustix::fs::lsetxattr(p, os(k), v, XattrFlags::empty()) {
            if symlink {
                // Linux refuses user.* xattrs on symlinks; tar warns and goes on, so do we.
                tracing::warn!(path = %p.display(), xattr = %String::from_utf8_lossy(k), error = %e, "xattr not set on symlink");
            } else {
                return Err(errno("setting xattrs on")(e));
            }
        }
    }
    rustix::fs::utimensat(CWD, p, &times(m), AtFlags::SYMLINK_NOFOLLOW).map_err(errno("setting times on"))
}

fn pax_time(secs: i64, nsec: u32) -> String {
    if nsec == 0 {
        return secs.to_string();
    }
    if secs < 0 {
        // -4 s + 0.75 s is written -3.25.
        let whole = secs + 1;
        let frac = 1_000_000_000 - nsec;
        let sign = if whole == 0 { "-" } else { "" };
        return format!("{sign}{whole}.{frac:09}");
    }
    format!("{secs}.{nsec:09}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn pax_time_formats_what_ingest_parses() {
        assert_eq!(super::pax_time(5, 0), "5");
        assert_eq!(super::pax_time(1, 500_000_000), "1.500000000");
        assert_eq!(super::pax_time(-4, 750_000_000), "-3.250000000");
        assert_eq!(super::pax_time(-1, 750_000_000), "-0.250000000");
    }
}
