//! The read-only filesystem: a merged image tree served from its index. Metadata operations
//! never leave memory; reads go through the [`Fetcher`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use hb_core::{ChunkId, ChunkRef, Kind, LayerIndex};

use crate::fetch::Fetcher;
use crate::window::Windows;

/// The image never changes under a mount: the kernel may cache everything for long.
const TTL: Duration = Duration::from_secs(3600);
/// Read-ahead when a file is read sequentially.
const READAHEAD_BYTES: u64 = 1 << 20;

/// How file data reaches readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsOptions {
    /// Try FUSE passthrough for fully-local files of at least `passthrough_min` bytes.
    pub passthrough: bool,
    pub passthrough_min: u64,
    /// Names the image in logs.
    pub image: String,
}

/// An open file: its chunks and where each starts.
struct Handle {
    entry: u32,
    chunks: Vec<ChunkRef>,
    starts: Vec<u64>,
    size: u64,
    /// End of the last read, to detect sequential reading.
    last_end: AtomicU64,
    _backing: Option<Arc<BackingId>>,
}

pub struct ImageFs {
    index: Arc<LayerIndex>,
    nlink: Vec<u32>,
    fetcher: Arc<Fetcher>,
    opts: FsOptions,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    backing: Mutex<HashMap<u32, Weak<BackingId>>>,
    /// One backing file set up at a time per inode: the kernel refuses (EIO) an open whose
    /// backing differs from the one already open for that inode, so concurrent first opens must
    /// share one.
    backing_setup: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// How each inode was first opened (true: passthrough). The kernel refuses to mix cached and
    /// passthrough opens of one inode, so the first open decides for the life of the mount.
    io_mode: Mutex<HashMap<u32, bool>>,
    /// Set by `init` when the kernel agreed to passthrough.
    passthrough_ok: Arc<AtomicBool>,
    /// Whether any entry carries extended attributes. Without any, `getxattr`/`listxattr`
    /// answer ENOSYS once and the kernel stops asking: overlayfs looks up `trusted.overlay.*`
    /// on the lower layer and exec asks for `security.capability`, a round trip each otherwise.
    has_xattrs: bool,
    /// Background fetches of the windows of files around their first touches.
    windows: Windows,
}

impl ImageFs {
    pub fn new(
        index: Arc<LayerIndex>,
        fetcher: Arc<Fetcher>,
        opts: FsOptions,
        passthrough_ok: Arc<AtomicBool>,
    ) -> Self {
        let mut nlink = vec![1u32; index.entries.len()];
        for (i, e) in index.entries.iter().enumerate() {
            match e.kind {
                Kind::Dir { .. } => {
                    nlink[i] += 1;
                    if i != 0 {
                        nlink[e.parent as usize] += 1;
                    }
                }
                Kind::Hardlink { target } => nlink[target as usize] += 1,
                _ => {}
            }
        }
        let has_xattrs = index.entries.iter().any(|e| !e.meta.xattrs.is_empty());
        ImageFs {
            index,
            nlink,
            windows: Windows::new(&fetcher),
            fetcher,
            opts,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            backing: Mutex::new(HashMap::new()),
            backing_setup: Mutex::new(HashMap::new()),
            has_xattrs,
            io_mode: Mutex::new(HashMap::new()),
            passthrough_ok,
        }
    }

    /// Entry index of an inode (inode = entry + 1; the root is inode 1).
    fn entry_of(&self, ino: INodeNo) -> Option<u32> {
        let i = ino.0.checked_sub(1)?;
        (i < self.index.entries.len() as u64).then_some(i as u32)
    }

    /// The entry that carries a path's data: a hard link resolves to its target.
    fn resolve(&self, i: u32) -> u32 {
        match self.index.entries[i as usize].kind {
            Kind::Hardlink { target } => target,
            _ => i,
        }
    }

    fn attr(&self, i: u32) -> FileAttr {
        let i = self.resolve(i);
        let e = &self.index.entries[i as usize];
        let (kind, size, rdev) = match &e.kind {
            Kind::Dir { .. } => (FileType::Directory, 4096, 0),
            Kind::File { size, .. } => (FileType::RegularFile, *size, 0),
            Kind::Symlink { target } => (FileType::Symlink, target.len() as u64, 0),
            Kind::CharDev { major, minor } => (FileType::CharDevice, 0, encode_dev(*major, *minor)),
            Kind::BlockDev { major, minor } => (FileType::BlockDevice, 0, encode_dev(*major, *minor)),
            Kind::Fifo => (FileType::NamedPipe, 0, 0),
            // Not in a merged tree; shown as empty files if they ever are.
            Kind::Hardlink { .. } | Kind::Whiteout | Kind::Opaque => (FileType::RegularFile, 0, 0),
        };
        let mtime = if e.meta.mtime >= 0 {
            UNIX_EPOCH + Duration::new(e.meta.mtime as u64, e.meta.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(e.meta.mtime.unsigned_abs())
                + Duration::from_nanos(e.meta.mtime_nsec as u64)
        };
        FileAttr {
            ino: INodeNo(i as u64 + 1),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (e.meta.mode & 0o7777) as u16,
            nlink: self.nlink[i as usize],
            uid: e.meta.uid,
            gid: e.meta.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_type(&self, i: u32) -> FileType {
        self.attr(i).kind
    }

    fn child(&self, parent: u32, name: &[u8]) -> Option<u32> {
        let kids = self.index.children(parent);
        kids.binary_search_by(|&k| self.index.entries[k as usize].name.as_slice().cmp(name)).ok().map(|p| kids[p])
    }

    fn path_of(&self, i: u32) -> String {
        String::from_utf8_lossy(&self.index.path(i)).into_owned()
    }

    /// Reads `size` bytes at `offset` of an open file.
    fn read_range(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, crate::fetch::FetchError> {
        if offset >= h.size || size == 0 || h.chunks.is_empty() {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(h.size);
        let first = h.starts.partition_point(|&s| s <= offset) - 1;
        let sequential = h.last_end.swap(end, Ordering::Relaxed) == offset && offset > 0;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut k = first;
        while k < h.chunks.len() && h.starts[k] < end {
            // Read-ahead: the rest of this read's chunks, and more when reading sequentially.
            let limit = if sequential { end + READAHEAD_BYTES } else { end };
            let ahead: Vec<ChunkId> =
                (k + 1..h.chunks.len()).take_while(|&j| h.starts[j] < limit).map(|j| h.chunks[j].id).collect();
            let data = self.fetcher.read(&h.chunks[k].id, &ahead)?;
            let cs = h.starts[k];
            let from = offset.max(cs) - cs;
            let to = end.min(cs + data.len() as u64) - cs;
            out.extend_from_slice(&data[from as usize..to as usize]);
            k += 1;
        }
        Ok(out)
    }

    /// Opens a local backing file for passthrough when the file is fully local.
    fn backing_for(&self, i: u32, chunks: &[ChunkRef], size: u64, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        if !self.opts.passthrough || size < self.opts.passthrough_min || !self.passthrough_ok.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(b) = self.backing.lock().expect("backing lock").get(&i).and_then(Weak::upgrade) {
            return Some(b);
        }
        let setup = self.backing_setup.lock().expect("backing setup lock").entry(i).or_default().clone();
        let _one = setup.lock().expect("backing setup lock");
        // (The lock stays in the map: one per file opened, and no two can ever be in use.)
        self.make_backing(i, chunks, reply)
    }

    /// [`Self::backing_for`] under the inode's setup lock: the backing another open made
    /// meanwhile, or a new one.
    fn make_backing(&self, i: u32, chunks: &[ChunkRef], reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        if let Some(b) = self.backing.lock().expect("backing lock").get(&i).and_then(Weak::upgrade) {
            return Some(b);
        }
        let path = match self.fetcher.store().backing_file(chunks) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(file = %self.path_of(i), error = %e, "cannot materialise for passthrough; reading through FUSE");
                return None;
            }
        };
        let file = std::fs::File::open(&path).ok()?;
        match reply.open_backing(&file) {
            Ok(id) => {
                let id = Arc::new(id);
                self.backing.lock().expect("backing lock").insert(i, Arc::downgrade(&id));
                Some(id)
            }
            Err(e) => {
                tracing::info!(error = %e, "the kernel refused a passthrough backing file; reading through FUSE");
                self.passthrough_ok.store(false, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Linux `new_encode_dev`.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

impl Filesystem for ImageFs {
    fn destroy(&mut self) {
        self.windows.close();
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(READAHEAD_BYTES as u32);
        // The image never changes: symlink targets may stay in the kernel's cache.
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO | InitFlags::FUSE_CACHE_SYMLINKS,
        );
        if self.opts.passthrough {
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok() {
                self.passthrough_ok.store(true, Ordering::Relaxed);
            } else {
                tracing::info!("the kernel does not offer FUSE passthrough; local files are read through FUSE");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.entry_of(parent) else { return reply.error(Errno::ENOENT) };
        if !matches!(self.index.entries[p as usize].kind, Kind::Dir { .. }) {
            return reply.error(Errno::ENOTDIR);
        }
        match self.child(p, name.as_bytes()) {
            Some(c) => reply.entry(&TTL, &self.attr(c), Generation(0)),
            // A negative entry (node id 0) with a timeout: the kernel remembers the name is
            // missing (the image never changes), so a container's PATH search or a runtime's
            // mount-point checks do not ask again.
            None => reply.entry(&TTL, &FileAttr { ino: INodeNo(0), ..self.attr(0) }, Generation(0)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry_of(ino) {
            Some(i) => reply.attr(&TTL, &self.attr(i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry_of(ino).map(|i| &self.index.entries[i as usize].kind) {
            Some(Kind::Symlink { target }) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(i) = self.entry_of(ino).map(|i| self.resolve(i)) else { return reply.error(Errno::ENOENT) };
        tracing::trace!(file = %self.path_of(i), "open");
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let (size, chunks) = match &self.index.entries[i as usize].kind {
            Kind::File { size, .. } => (*size, self.index.file_chunks(i).copied().collect::<Vec<_>>()),
            Kind::Dir { .. } => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::EINVAL),
        };
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0u64;
        for c in &chunks {
            starts.push(at);
            at += c.len as u64;
        }
        let mode = self.io_mode.lock().expect("io mode lock").get(&i).copied();
        let backing = match mode {
            Some(false) => None,
            _ => self.backing_for(i, &chunks, size, &reply),
        };
        match (mode, &backing) {
            (None, b) => {
                self.io_mode.lock().expect("io mode lock").insert(i, b.is_some());
            }
            (Some(true), None) => {
                tracing::error!(file = %self.path_of(i), "passthrough file lost its backing file: EIO");
                return reply.error(Errno::EIO);
            }
            _ => {}
        }
        match backing {
            // The file's first window starts on its way now, before its first read.
            None => self.windows.around(i, &chunks, &starts, 0),
            // A start learning its order sees no read of a passthrough file (a file a start-up
            // guess fetched before it was opened): the open stands for them.
            Some(_) => self.fetcher.record_guessed(chunks.iter().map(|c| c.id)),
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h =
            Arc::new(Handle { entry: i, chunks, starts, size, last_end: AtomicU64::new(0), _backing: backing.clone() });
        self.handles.lock().expect("handles lock").insert(fh, h);
        match backing {
            // KEEP_CACHE does not go with passthrough: the backing file's page cache serves.
            Some(b) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handles.lock().expect("handles lock").get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        tracing::trace!(file = %self.path_of(h.entry), offset, size, "read");
        match self.read_range(&h, offset, size) {
            Ok(data) => {
                reply.data(&data);
                self.windows.around(h.entry, &h.chunks, &h.starts, offset);
            }
            Err(e) => {
                tracing::error!(image = %self.opts.image, file = %self.path_of(h.entry), offset, error = %e, "read failed: EIO");
                reply.error(Errno::EIO)
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().expect("handles lock").remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // A directory handle carries nothing here (listings come from the index by inode), so
        // ENOSYS: the kernel stops sending OPENDIR and RELEASEDIR for this mount and keeps
        // listings cached (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE is its default then), two round
        // trips fewer per directory open (overlayfs opens the lower directory of each copy-up).
        reply.error(Errno::ENOSYS)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(d) = self.entry_of(ino) else { return reply.error(Errno::ENOENT) };
        let parent = self.index.entries[d as usize].parent;
        let kids = self.index.children(d);
        for n in offset as usize..kids.len() + 2 {
            let (ino, kind, name): (u64, FileType, &[u8]) = match n {
                0 => (d as u64 + 1, FileType::Directory, b"."),
                1 => (parent as u64 + 1, FileType::Directory, b".."),
                _ => {
                    let c = kids[n - 2];
                    (self.resolve(c) as u64 + 1, self.file_type(c), &self.index.entries[c as usize].name)
                }
            };
            if reply.add(INodeNo(ino), n as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(d) = self.entry_of(ino) else { return reply.error(Errno::ENOENT) };
        let parent = self.index.entries[d as usize].parent;
        let kids = self.index.children(d);
        for n in offset as usize..kids.len() + 2 {
            let (entry, name): (u32, &[u8]) = match n {
                0 => (d, b"."),
                1 => (parent, b".."),
                _ => (kids[n - 2], &self.index.entries[kids[n - 2] as usize].name),
            };
            let attr = self.attr(entry);
            if reply.add(attr.ino, n as u64 + 1, OsStr::from_bytes(name), &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes = self.index.content_bytes();
        reply.statfs(bytes.div_ceil(4096), 0, 0, self.index.entries.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.has_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let Some(i) = self.entry_of(ino).map(|i| self.resolve(i)) else { return reply.error(Errno::ENOENT) };
        let xattrs = &self.index.entries[i as usize].meta.xattrs;
        match xattrs.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) {
            None => reply.error(Errno::ENODATA),
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some((_, v)) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.has_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let Some(i) = self.entry_of(ino).map(|i| self.resolve(i)) else { return reply.error(Errno::ENOENT) };
        let mut names = Vec::new();
        for (k, _) in &self.index.entries[i as usize].meta.xattrs {
            names.extend_from_slice(k);
            names.push(0);
        }
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); only existence here.
        match self.entry_of(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}
